"""Child process of bench_lineage: start labdeck headless, drive the Lineage tab with a Pilot, record marks, exit.

Usage: ``python3 _lineage_driver.py MODE OUT.json`` with ``LABDECK_HOME`` and ``LABDECK_BENCH_T0``
(the parent's ``time.perf_counter()`` just before the spawn: CLOCK_MONOTONIC, shared by all
processes on Linux) set.

MODE:
  switch  the home's config starts on Instances (the default). Once the runs are loaded (the
          Lineage tab holds the team's view and has not drawn it: it draws lazily) and the app
          is idle, the Pilot presses ``4`` and times press → ``LineageTab.rerender`` done (the
          tree holds its roots) → the next frame. Then, ``LABDECK_BENCH_FILTERS`` times each,
          ``LineageTab.apply_filter(FILTER)`` → rerender done → next frame, and the same for
          clearing it (``apply_filter("")``), alternating. Then the filter is typed into the
          ``/`` bar one key at a time (each key re-filters, as in the app) and submitted with
          enter: per key, Key event sent → the rerender it causes → the frame after it. RSS
          (now and peak) is read after each phase.
  start   the home's config says ``[ui] start_tab = "lineage"``: marks from process start to
          the first frame, to the rerender that puts roots in the tree, to the frame after it.

Marks are seconds since T0 (start) or durations in seconds (switch); RSS in bytes.
``LABDECK_BENCH_PROFILE=PREFIX`` writes cProfile stats of the main thread for the measured
windows only: ``PREFIX.switch`` (press → frame) and ``PREFIX.filter`` (every filter application
→ frame; clears are not profiled) in switch mode, ``PREFIX.start`` (the runs arrive → the tree
is painted) in start mode. Time in the garbage collector is measured in every window (gc.callbacks).
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time

T0 = float(os.environ["LABDECK_BENCH_T0"])
MARKS: dict[str, object] = {"python": time.perf_counter() - T0}
# import labdeck from this checkout, not from whatever `labdeck` is installed (python puts this file's
# folder on sys.path, not the repository root)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
SIZE = (160, 48)  # a typical terminal, as in bench_tui_start
GIVE_UP_S = 60.0
FILTER = os.environ.get("LABDECK_BENCH_FILTER", "user:alice lr>1e-3 metric.val_loss<0.5")
FILTER_REPEATS = int(os.environ.get("LABDECK_BENCH_FILTERS", "8"))
TYPE_FILTER = os.environ.get("LABDECK_BENCH_TYPE", "1") == "1"
PROFILE = os.environ.get("LABDECK_BENCH_PROFILE")


def since() -> float:
    return time.perf_counter() - T0


def rss_now() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class GcMeter:
    """Time spent in the garbage collector (gc.callbacks), by generation, since the process started."""

    def __init__(self) -> None:
        import gc

        self.ms = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            g = info.get("generation", 0)
            self.ms[g] += (time.perf_counter() - self._t) * 1000
            self.count[g] += 1

    def snap(self) -> tuple[float, int, float]:
        """(total ms, full collections, ms in full collections)."""
        return sum(self.ms), self.count[2], self.ms[2]

    def since(self, before: tuple[float, int, float]) -> dict[str, float]:
        now = self.snap()
        return {"gc_ms": now[0] - before[0], "gc_full": now[1] - before[1], "gc_full_ms": now[2] - before[2]}


GC = GcMeter()


def run(mode: str) -> None:
    import inspect
    from pathlib import Path

    from textual.widgets import Static, Tree

    from backends.workstation import Workstation
    from tui.app import LabdeckApp
    from tui.tabs.lineage import LineageTab

    MARKS["imported"] = since()
    MARKS["labdeck_from"] = os.path.dirname(os.path.dirname(inspect.getfile(LabdeckApp)))

    # ---- instrument LineageTab.rerender (this process only; tui/ is untouched) ----
    events: list[dict[str, float | int]] = []  # one per rerender: start, end, roots, painted
    original_rerender = LineageTab.rerender

    def rerender(self: LineageTab) -> None:
        ev: dict[str, float | int] = {"start": since()}
        original_rerender(self)
        ev["end"] = since()
        ev["roots"] = len(self.query_one(Tree).root.children) if self.is_mounted else -1
        events.append(ev)
        if self.is_mounted:
            self.call_after_refresh(_painted, ev)

    def _tree_lines() -> int:
        """Lines the Tree widget has built for display (it builds them when it renders): -1 if none yet."""
        tree = app.query_one(LineageTab).query_one(Tree)
        lines = getattr(tree, "_tree_lines_cached", None)
        return -1 if lines is None else len(lines)

    def _painted(ev: dict[str, float | int]) -> None:
        ev["painted"] = since()
        ev["tree_lines"] = _tree_lines()
        if mode == "start" and ev.get("roots", 0) > 0 and "tree_painted" not in MARKS:
            if start_prof is not None:
                start_prof.disable()
                start_prof.dump_stats(f"{PROFILE}.start")
            before = MARKS.pop("gc_before_draw", None)
            if before:
                MARKS.update({f"draw_{k}": v for k, v in GC.since(tuple(before)).items()})
            MARKS["tree_lines"] = _tree_lines()
            MARKS["tree_rerender_start"] = ev["start"]
            MARKS["tree_rerendered"] = ev["end"]
            MARKS["tree_painted"] = ev["painted"]
            MARKS["roots"] = ev["roots"]
            MARKS["rss_shown"] = rss_now()
            MARKS["rss_peak"] = rss_peak()
            app.exit()

    LineageTab.rerender = rerender  # type: ignore[method-assign]

    start_prof = None
    if mode == "start" and PROFILE:
        import cProfile

        start_prof = cProfile.Profile()
    original_on_runs_loaded = LabdeckApp.on_runs_loaded

    def on_runs_loaded(self: LabdeckApp, message) -> None:
        if "runs_arrived" not in MARKS:  # the first RunsLoaded: the team's view read in a worker thread
            MARKS["runs_arrived"] = since()
            MARKS["gc_before_draw"] = GC.snap()
            if start_prof is not None:
                start_prof.enable()
        original_on_runs_loaded(self, message)

    LabdeckApp.on_runs_loaded = on_runs_loaded  # type: ignore[method-assign]

    class Probe(LabdeckApp):
        # Textual resolves a relative CSS_PATH next to the subclass's file: point it back at tui/
        CSS_PATH = str(Path(inspect.getfile(LabdeckApp)).parent / LabdeckApp.CSS_PATH)

        def on_ready(self) -> None:
            MARKS["first_frame"] = since()
            if mode == "start":
                self.set_timer(GIVE_UP_S, self._give_up)

        def _give_up(self) -> None:
            MARKS["error"] = f"no lineage tree after {GIVE_UP_S:g} s"
            self.exit()

    app = Probe(Workstation.open(os.environ["LABDECK_HOME"]), live=False)
    MARKS["built"] = since()

    async def next_frame() -> float:
        """Wait for the frame after everything pending now; returns its time (since T0)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        app.screen.call_after_refresh(lambda: fut.done() or fut.set_result(since()))
        return await fut

    async def pilot_switch(pilot) -> None:
        prof = None
        if PROFILE:
            import cProfile

            prof = {"switch": cProfile.Profile(), "filter": cProfile.Profile()}
        tab = app.query_one(LineageTab)
        deadline = time.monotonic() + GIVE_UP_S
        while tab.view is None or any(w.is_running for w in app.workers):  # runs loaded, workers done
            if time.monotonic() > deadline:
                MARKS["error"] = f"runs not loaded into the Lineage tab after {GIVE_UP_S:g} s"
                app.exit()
                return
            await asyncio.sleep(0.01)
        await pilot.pause(0.2)
        await next_frame()
        MARKS.pop("gc_before_draw", None)
        MARKS["loaded"] = since()
        MARKS["runs_in_view"] = len(tab.view.runs)
        MARKS["dirty_before_press"] = tab._dirty
        MARKS["rss_loaded"] = rss_now()
        MARKS["rss_peak_loaded"] = rss_peak()

        # (1) press 4: Instances → Lineage
        n_before = len(events)
        if prof:
            prof["switch"].enable()
        gc0 = GC.snap()
        t = since()
        await pilot.press("4")
        returned = since()
        painted = await next_frame()
        if prof:
            prof["switch"].disable()
        mine = events[n_before:]
        ev = next((e for e in mine if e.get("roots", 0) > 0), None)
        MARKS["active_tab"] = app.query_one("TabbedContent").active
        if ev is None:
            MARKS["error"] = f"pressing 4 drew no roots ({len(mine)} rerenders)"
            app.exit()
            return
        MARKS["switch_rerender_start"] = ev["start"] - t
        MARKS["switch_rerendered"] = ev["end"] - t
        MARKS["switch_rerender_only"] = ev["end"] - ev["start"]
        MARKS["switch_press_returned"] = returned - t
        MARKS["switch_frame_after_rerender"] = ev["painted"] - t if "painted" in ev else None
        MARKS["switch_tree_lines"] = ev.get("tree_lines")
        MARKS.update({f"switch_{k}": v for k, v in GC.since(gc0).items()})
        MARKS["switch_painted"] = max(painted, ev.get("painted", 0.0)) - t
        MARKS["roots"] = ev["roots"]
        MARKS["rss_shown"] = rss_now()
        MARKS["rss_peak_shown"] = rss_peak()

        # (2) apply_filter, alternating with clearing it
        await pilot.pause(0.1)
        status = tab.query_one("#lineage-status", Static)
        filt: list[dict[str, float]] = []
        clear: list[dict[str, float]] = []
        for _ in range(FILTER_REPEATS):
            for text, out in ((FILTER, filt), ("", clear)):
                await next_frame()
                p = prof["filter"] if prof and text else None
                if p:
                    p.enable()
                gc0 = GC.snap()
                t = since()
                tab.apply_filter(text)
                called = since()
                painted = await next_frame()
                if p:
                    p.disable()
                out.append({"call": called - t, "painted": painted - t, **GC.since(gc0)})
                if text:
                    MARKS["filter_roots"] = len(tab.query_one(Tree).root.children)
                    MARKS["filter_status"] = str(status.render())[:200]
                    MARKS["filter_error"] = tab.filter_error
        MARKS["filter"] = filt
        MARKS["clear"] = clear
        MARKS["rss_filtered"] = rss_now()

        # (3) typed into the / bar, one key at a time (each key re-filters), then enter
        if TYPE_FILTER:
            from textual import events as tev

            await pilot.press("slash")
            await next_frame()
            keys: list[dict[str, float]] = []
            for ch in FILTER:
                # the key goes in as Pilot sends it (a Key event to the driver), without Pilot's idle waits,
                # which take ~80 ms per key by themselves; timed to the frame after the rerender it causes
                key = {" ": "space", ":": "colon", ">": "greater_than_sign", "<": "less_than_sign", ".": "full_stop",
                       "-": "minus", "_": "underscore"}.get(ch, ch)
                n_before = len(events)
                gc0 = GC.snap()
                t = since()
                app._driver.send_message(tev.Key(key, ch))
                deadline = time.monotonic() + 10
                while not (len(events) > n_before and "painted" in events[n_before]) and time.monotonic() < deadline:
                    await asyncio.sleep(0.0005)
                if len(events) <= n_before or "painted" not in events[n_before]:
                    MARKS["error"] = f"typing {ch!r} in the / bar drew nothing"
                    break
                ev = events[n_before]
                keys.append({"rerendered": ev["end"] - t, "painted": ev["painted"] - t, **GC.since(gc0)})
            await pilot.press("enter")
            await next_frame()
            MARKS["typed_keys"] = keys
            MARKS["typed_filter_text"] = tab.filter_text
            MARKS["typed_roots"] = len(tab.query_one(Tree).root.children)
            MARKS["typed_bar_hidden"] = not app.query_one("#filter-bar").display
        MARKS["rss_end"] = rss_now()
        MARKS["rss_peak"] = rss_peak()
        MARKS["rerenders"] = len(events)
        if prof:
            for k, p in prof.items():
                p.dump_stats(f"{PROFILE}.{k}")
        app.exit()

    app.run(headless=True, size=SIZE, auto_pilot=pilot_switch if mode == "switch" else None)
    MARKS["exited"] = since()
    if app.return_code:
        MARKS["error"] = f"app exited with return code {app.return_code}"


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    try:
        run(mode)
    except BaseException as e:  # report, don't hide: the parent shows it
        import traceback

        MARKS["error"] = f"{type(e).__name__}: {e}"
        MARKS["traceback"] = traceback.format_exc()[-3000:]
    import json

    with open(out, "w", encoding="utf-8") as f:
        json.dump(MARKS, f)


if __name__ == "__main__":
    main()
